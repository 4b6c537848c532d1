"""Run records: DLLogger-format JSON lines, console lines, progress bars."""
