# perfused: PUFFS Enabled Relay to FUSE.  Works with BSD make and GNU make.

PYTHON ?=	python3
PREFIX ?=	/usr/local
DESTDIR ?=

test:
	$(PYTHON) -m pytest -q test_perfused.py

clean:
	rm -rf __pycache__ .pytest_cache

.PHONY: test clean
