"""Session lifecycles, their media graphs and clocks, and admission control."""
