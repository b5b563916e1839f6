# tracer-bpf build and test entry points.
#   make          rebuild tracer.bpf.o from tracer.bpf.c (clang, no kernel headers),
#                 and the tests' test/selftest.bpf.o
#   make test     the test suite (as root for the live tests)
#   make vm-test  the kprobe tests inside Debian kernels under qemu
#   make bench    benchmarks that print figures
#   make check    everything CI runs, after installing what a fresh Debian lacks
CLANG ?= clang
PYTHON ?= python3
# -g0 (no debug info, so no paths) and -fno-ident keep the object
# byte-identical across builds and directories.
BPF_CFLAGS = -O2 -g0 -target bpf -Wall -Werror -Wno-unused-function -fno-ident

all: tracer.bpf.o test/selftest.bpf.o

tracer.bpf.o: tracer.bpf.c tracer.bpf.h
	$(CLANG) $(BPF_CFLAGS) -c tracer.bpf.c -o $@

# self-test programs and maps for the loader tests: not in the production object
test/selftest.bpf.o: test/selftest.bpf.c tracer.bpf.h
	$(CLANG) $(BPF_CFLAGS) -c test/selftest.bpf.c -o $@

test:
	$(PYTHON) -m pytest -ra -m "not kprobe" --ignore=test/vm test/

# In each Debian kernel under qemu (as root): --check (the guessed offsets
# and guessing time of the kprobe backend), then the kprobe test selection.
VM_KERNELS ?= 5.10,6.1,6.12
VM_CMD = python3 tracer.py --check --backend kprobe && \
	python3 -m pytest -ra -m kprobe -p no:cacheprovider test/test_kprobe.py
vm-test:
	$(PYTHON) test/vm/run.py --kernel $(VM_KERNELS) --timeout 1500 -- sh -c '$(VM_CMD)'

# Benchmarks print figures (BENCHMARKS.md records them); root; run on a quiet machine.
bench:
	$(PYTHON) bench/run.py

vm-bench:
	$(PYTHON) bench/vm.py --install-peers

check:
	PYTHON=$(PYTHON) bash test/setup.sh
	$(PYTHON) tools/check_runtime.py
	$(PYTHON) -m pytest -ra -m "not kprobe" --ignore=test/vm test/
	$(MAKE) vm-test

.PHONY: all test vm-test check bench vm-bench
