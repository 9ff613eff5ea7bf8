"""sshd test fixtures (filled in by the SSH work)."""
