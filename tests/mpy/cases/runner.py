"""Run one shared case module under whichever runtime executes this file (MicroPython or CPython).

    micropython runner.py case_ec VECTOR_DIR OUT_DIR
Every function named test_* is called with a ctx dict {vec, out, runtime}. Prints one line per test and
closes with "N passed, M failed"; exits 1 if anything failed.
"""
import sys

HERE = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
ROOT = HERE + "/../../.."
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT + "/agent")  # the board package is imported as top-level "mpy", as on a board


def main():
    name = sys.argv[1]
    only = sys.argv[4] if len(sys.argv) > 4 else None
    ctx = {"vec": sys.argv[2] if len(sys.argv) > 2 else "", "out": sys.argv[3] if len(sys.argv) > 3 else "",
           "runtime": sys.implementation.name}
    mod = __import__(name)
    names = sorted(n for n in dir(mod) if n.startswith("test_") and (only is None or n == only))
    passed = failed = 0
    for n in names:
        try:
            getattr(mod, n)(ctx)
            passed += 1
            print("PASS", n)
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print("FAIL", n, type(e).__name__, e)
            if hasattr(sys, "print_exception"):
                sys.print_exception(e)
            else:
                import traceback

                traceback.print_exc()
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed or not passed else 0)


main()
