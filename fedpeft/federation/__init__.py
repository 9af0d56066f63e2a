"""The server's side of a federation without Flower: state, roster, rounds, aggregation, evaluation, metrics."""
