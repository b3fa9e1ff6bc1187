"""The study's sweep without Ray: recipes, trial plans, the report and status read from files."""
