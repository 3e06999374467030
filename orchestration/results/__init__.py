"""Reading a sweep's results from MLflow: the leaderboard, the comparison table, the plots and
the prior-shift analysis."""
