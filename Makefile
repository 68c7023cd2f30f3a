# uPETe node — the two commands a newcomer needs: `make serve` and `make test`.
# Everything lands in .venv; torch is pinned through constraints.txt (see README "GPU servers").

VENV    ?= .venv
PYTHON  ?= python3
CONFIG  ?= config/node.yaml
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test peers lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,bench]'
	@touch $@

serve: $(STAMP)
	$(VENV)/bin/upete serve --config $(CONFIG)

# The real DICOM peers the tests talk to: DCMTK and Orthanc (with its DICOMweb plugin, for STOW-RS) from
# Debian; dciodvfy comes with the `dicom3tools` package in the venv (test extra); systemd-analyze
# (package systemd) verifies the unit; openssl makes the TLS tests' certificates; chromium (headless)
# opens the status page.
DICOMWEB_PLUGIN = /usr/share/orthanc/plugins/libOrthancDicomWeb.so
peers:
	@if [ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] && [ -x /usr/bin/echoscu ] && [ -x /usr/sbin/Orthanc ] \
		&& [ -f $(DICOMWEB_PLUGIN) ] && [ -x /usr/bin/systemd-analyze ] && [ -x /usr/bin/openssl ] \
		&& [ -x /usr/bin/chromium ]; then \
		echo "peers: DCMTK, Orthanc with DICOMweb, systemd-analyze, openssl and chromium present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			dcmtk orthanc orthanc-dicomweb systemd openssl chromium; \
	else \
		echo "DCMTK, Orthanc, orthanc-dicomweb, systemd-analyze, openssl or chromium are missing. Install them, then run make test again:"; \
		echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends dcmtk orthanc orthanc-dicomweb systemd openssl chromium"; \
		exit 1; \
	fi

test: $(STAMP) peers
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
