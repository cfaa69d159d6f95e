// Bookkeeping shared by the test programs: check() records one result, report() prints the summary
// line that tests/test_planner.py reads ("N passed, N failed") and returns the exit status.
#pragma once

#include <cstdio>
#include <string>

namespace test_counts {
inline int passed = 0;
inline int failed = 0;
}  // namespace test_counts

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++test_counts::passed;
  } else {
    ++test_counts::failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

inline int report() {
  std::printf("%d passed, %d failed\n", test_counts::passed, test_counts::failed);
  return test_counts::failed == 0 ? 0 : 1;
}
