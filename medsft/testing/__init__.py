"""TEST-ONLY hooks that production code calls but that do nothing unless a test sets their environment
variable (MEDSFT_TEST_FAULTS, MEDSFT_DEBUG_DUMP). No config key reaches them."""
