"""The server's side of a federation: state, roster, rounds (plain and under SecAgg+), aggregation, evaluation,
metrics; the wire format (`wire`) its messages carry adapters in."""
