"""TEST-ONLY lab PKI for demos and tests: never use it to run a real plant.

Keys of the lab CA are stored unencrypted (0600) in the lab directory; it exists so that tests and
``make demo`` have a real CA on loopback that standard tools (openssl verify, curl, openssl cmp) can check.
"""
