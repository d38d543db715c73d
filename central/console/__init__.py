"""The centre's web console for the operators at the security desk.

Served by ``wardpost receiver run`` (``[console] enabled = true``) or
``wardpost console run``, from the receiver's store. See central/README.md.
Importing this package stays light: the web stack loads in :mod:`.app`.
"""
