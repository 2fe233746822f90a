"""The Unix socket listeners, peer credentials, local policy, request handlers."""
