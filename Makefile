# perfused.py: PUFFS Enabled Relay to FUSE.
# Portable: BSD make (pkgsrc's bmake) and GNU make alike.

PYTHON ?=	python3
PREFIX ?=	/usr/local
DESTDIR ?=
# Where libperfuse.py goes, relative to PREFIX; empty: Python's own
# site-packages under PREFIX (pkgsrc passes PYSITELIB).
PYSITELIB ?=
MANDIR ?=	$(PREFIX)/man
EXAMPLESDIR ?=	$(PREFIX)/share/examples

test:
	$(PYTHON) -m pytest -q test_perfused.py

demo:
	$(PYTHON) bench.py demo

bench:
	$(PYTHON) bench.py bench

# the fault and fuzz campaigns at their full sizes (the suite runs them smaller)
stress:
	PERFUSE_STRESS=1 $(PYTHON) -m pytest -q -s -k campaign test_perfused.py

install:
	@python=`$(PYTHON) -c 'import sys; print(sys.executable)'`; \
	site="$(PYSITELIB)"; \
	if [ -z "$$site" ]; then \
		site=`$(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))'`; \
	fi; \
	set -e; \
	mkdir -p $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/$$site \
	    $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man3 \
	    $(DESTDIR)$(EXAMPLESDIR)/rc.d; \
	sed "1s|^#!.*|#!$$python|" perfused.py > $(DESTDIR)$(PREFIX)/sbin/perfused; \
	chmod 755 $(DESTDIR)$(PREFIX)/sbin/perfused; \
	cp libperfuse.py $(DESTDIR)$(PREFIX)/$$site/libperfuse.py; \
	chmod 644 $(DESTDIR)$(PREFIX)/$$site/libperfuse.py; \
	cp perfused.8 $(DESTDIR)$(MANDIR)/man8/perfused.8; \
	cp libperfuse.3 $(DESTDIR)$(MANDIR)/man3/libperfuse.3; \
	chmod 644 $(DESTDIR)$(MANDIR)/man8/perfused.8 $(DESTDIR)$(MANDIR)/man3/libperfuse.3; \
	sed -e "s|@PREFIX@|$(PREFIX)|" -e "s|@PYTHON@|$$python|" perfused.rc \
	    > $(DESTDIR)$(EXAMPLESDIR)/rc.d/perfused; \
	chmod 755 $(DESTDIR)$(EXAMPLESDIR)/rc.d/perfused; \
	echo "installed under $(DESTDIR)$(PREFIX) (libperfuse.py in $$site)"

uninstall:
	@site="$(PYSITELIB)"; \
	if [ -z "$$site" ]; then \
		site=`$(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))'`; \
	fi; \
	rm -f $(DESTDIR)$(PREFIX)/sbin/perfused $(DESTDIR)$(PREFIX)/$$site/libperfuse.py \
	    $(DESTDIR)$(MANDIR)/man8/perfused.8 $(DESTDIR)$(MANDIR)/man3/libperfuse.3 \
	    $(DESTDIR)$(EXAMPLESDIR)/rc.d/perfused

clean:
	rm -rf __pycache__ .pytest_cache

.PHONY: test demo bench stress install uninstall clean
