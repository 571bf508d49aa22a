"""Child process of the memory probes: peak extra memory of loss forward+backward calls, as JSON.

Run by ``rmi_bench.measure_peak_memory_of`` in a fresh interpreter (the benchmark suite: one per
case; the training demo: one for its losses), so that the peak resident memory belongs to these
calls alone; they run one after the other, each from its own baseline
(``rmi_bench.peak_extra_bytes_cpu``), through ``rmi_bench.run_probes``.
Usage: ``python _memprobe.py '{"probe": "rmi_bench:probe_case", "device": "cpu",
"calls": {"torch": {"case": {...}, "backend": "torch"}}}'``; prints ``{key: result}``.
"""
import json
import sys

import rmi_bench


def main(argv):
    request = json.loads(argv[1])
    print(json.dumps(rmi_bench.run_probes(request["probe"], request["calls"], request["device"])))


if __name__ == "__main__":
    main(sys.argv)
