from tlkit.cli import run

run()
