"""The tools' commands: ``flexmol embed``, ``flexmol explain``, ``flexmol retrieve index|query``."""


def add_parsers(sub, _sub) -> None:
    from flexmol.tools import embed, explain, retrieve

    for tool in (embed, explain, retrieve):
        tool.add_parser(sub, _sub)
