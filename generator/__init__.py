"""Generator of realistic click logs with planted structure (default data and test data)."""
