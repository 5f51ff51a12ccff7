"""`make demo`: DP training of a small CNN on scikit-learn's digits (see veil/demo.py)."""
from veil.demo import main

if __name__ == "__main__":
    main()
