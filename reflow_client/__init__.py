"""Protocol, manifest types and client library for reflow."""
