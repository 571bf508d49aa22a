"""Child process of the benchmark suite: peak extra memory of one forward+backward, as JSON.

Run by ``rmi_bench.measure_peak_memory`` in a fresh interpreter per case, so that the peak
resident memory belongs to that case alone; backends are measured one after the other, each
from its own baseline (``rmi_bench.peak_extra_bytes_cpu``).
Usage: ``python _memprobe.py '{"case": {...}, "backends": ["torch"], "device": "cpu"}'``.
"""
import json
import sys
import traceback

import rmi_bench


def main(argv):
    request = json.loads(argv[1])
    case = rmi_bench.Case(**{**request["case"], "shape": tuple(request["case"]["shape"])})
    results = {}
    for backend in request["backends"]:
        try:
            results[backend] = rmi_bench.probe(case, backend, request["device"])
        except Exception:  # report it against this backend, measure the others
            results[backend] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv)
