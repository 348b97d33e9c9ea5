def moving_average(values, window):
    """Return the list of averages of each run of `window` consecutive values."""
