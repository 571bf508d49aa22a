"""Child process of the benchmark suite: peak extra memory of one forward+backward, as JSON.

Run by ``rmi_bench.measure_peak_memory`` in a fresh interpreter per (case, backend), so that the
process's peak resident memory belongs to that case alone.
Usage: ``python _memprobe.py '{"case": {...}, "backend": "torch", "device": "cpu"}'``.
"""
import json
import sys

import rmi_bench


def main(argv):
    request = json.loads(argv[1])
    case = rmi_bench.Case(**{**request["case"], "shape": tuple(request["case"]["shape"])})
    print(json.dumps(rmi_bench.probe(case, request["backend"], request["device"])))


if __name__ == "__main__":
    main(sys.argv)
