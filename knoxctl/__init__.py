"""knoxctl: the operator CLI (Knox key commands and daemon inspection)."""
