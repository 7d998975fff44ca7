"""The ``tlbptt`` command line: the applications' layer on top of ``lightning_tlbptt``.

It lives outside the ``lightning_tlbptt`` package on purpose: importing that package registers the strategy with
Lightning (``Trainer(strategy="tlbptt")``), which loads Lightning, while ``tlbptt --help`` and
``tlbptt costs --help`` must answer without it. Each command imports what it runs once its options are parsed.
"""
