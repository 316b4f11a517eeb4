"""`crd dashboard`: a live, read-only web view of one or more lines (Starlette + server-sent events)."""
