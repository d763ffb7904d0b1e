"""Pictures: display stretch, top-k sheets, and the HTML report."""
