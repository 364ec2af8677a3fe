"""Studies: study files, their dry run, launching jobs, and the demo."""
