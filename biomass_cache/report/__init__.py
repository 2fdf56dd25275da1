"""Reports a person decides from: intervals, paired comparisons, prediction intervals, the HTML reports."""
