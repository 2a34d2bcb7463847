"""devagent's board agent: a stand-alone identity agent for MicroPython boards (ESP32, Pico W).

It runs unchanged under MicroPython and CPython and imports nothing outside this package.
Modules (each small, loaded on demand): compat (runtime differences), ec/ecdsa (P-256), hmac256,
der, rsa, x509 (certificate checking), csr (PKCS#10 and SEC1 keys), cbor, store (flash storage),
agent (lifecycle), frame/serial_agent (UART/USB transport), coap (CoAP+HMAC over UDP).
"""
VERSION = "0.1.0"
