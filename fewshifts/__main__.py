from fewshifts.cli import console

raise SystemExit(console())
