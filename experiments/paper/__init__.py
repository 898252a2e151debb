"""The paper's tables, bound curves and training figures."""
