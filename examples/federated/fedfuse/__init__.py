"""A Flower app: a small MLP learns scikit-learn's digits, aggregated by modelfuse."""
