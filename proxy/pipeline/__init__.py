"""The forwarding pipeline: admit, read the body, take a permit, add credentials, send,
answer; with retries and the in-flight cap."""
