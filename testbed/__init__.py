"""What the benchmarks, examples and tests share (the models), kept out of the installed
package: not in the sdist or the wheel; bench/ and tests/ put the repository root on
sys.path to import it."""
