"""Layer 6, tools: the console commands (moco-train, -eval, -export, -bench, -sweep), the
operator counter, the bench report, sweeps and the GPU proof kit."""
