"""The LuxSci REST API: signing, the rolling auth-code session, code harvesting, uploads."""
