"""Video input, vision preprocessing and subtitle output."""
