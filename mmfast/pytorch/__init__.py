"""The pure-PyTorch paths: ``reference`` (the readable oracle, backend ``"torch"``, and the
home of the precision constants) and ``foreach`` (the fastest stock-PyTorch version,
backend ``"foreach"``)."""
