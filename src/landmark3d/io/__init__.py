"""File input/output: images through SimpleITK, landmark files in the field's formats."""
