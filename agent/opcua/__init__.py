"""OPC UA push management (OPC 10000-12 §7.7/§7.8): the device side (``push`` core, ``server`` on asyncua,
``deploy`` into the OPC UA PKI directory) and the management side (``client``, used by the CLM and by tests acting
as a GDS). asyncua is imported only by ``server`` and ``client`` (the ``opcua`` extra). See docs/opcua.md.
"""
