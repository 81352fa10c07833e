# Every target runs the nox session of the same name (noxfile.py holds the work), with
# ARGS passed after --: `make tests ARGS="-k bake"` runs `nox -s tests -- -k bake`.
.DEFAULT_GOAL := help
.PHONY: help test tests lint bake demo bench relock

help:
	@echo 'make TARGET [ARGS="..."] runs nox -s TARGET -- ARGS (make test: make tests); the targets:'
	@nox --list

test: tests

tests:
	nox -s tests -- $(ARGS)

lint:
	nox -s lint -- $(ARGS)

bake:
	nox -s bake -- $(ARGS)

demo:
	nox -s demo -- $(ARGS)

bench:
	nox -s bench -- $(ARGS)

relock:
	nox -s relock -- $(ARGS)
