"""A small tabular model family that lives outside ``pipelines.families`` (the contract test's).

``tests/test_family_contract.py`` copies this folder into a temporary package of its own name
and runs the whole pipeline with ``model.family: <package>.family:ToyTabular``: nothing in
MaaS names it. See ``family.py`` (the contract) and ``service/`` (its BentoML service).
"""
