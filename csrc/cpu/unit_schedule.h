// Dynamic scheduling of a fixed list of work units, deterministic results, no barriers.
//
// The tiled kernels split their work into units (a tile, or a run of tiles) whose list depends
// on the shape alone. A unit may update shared per-block state in place (the running (max, sum)
// of a row block, a block of the gradient); such a block is a *lane*, and the units touching a
// lane must reach it in the list's order so that the floating-point sums it receives come in
// the same order at every thread count. Each unit names at most two lanes.
//
// A previous version ran the list in rounds separated by a barrier (a wavefront). On a shared
// machine every barrier waited for a descheduled thread: fwd+bwd at 2 threads took 1.16-1.46x
// the time of the per-thread-partials kernels it replaced (issue 10). Here each thread claims the
// first unclaimed unit whose lanes are ready (every earlier unit of each of its lanes is done),
// so a thread only waits when nothing anywhere in the list can run; which thread runs a unit
// varies from run to run, what the unit computes and the order each lane sees do not.
//
// Cost: per unit two int32 lanes and their positions and one claim flag (O(units) memory, the
// size of the tile list itself), and a scan from the first unclaimed unit per claim.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

namespace fastssl {

class UnitSchedule {
 public:
  explicit UnitSchedule(int64_t lanes) : lane_len_(lanes, 0) {}

  // Appends a unit that updates lanes a and b in place (-1: none; b == a counts once). Units
  // without lanes write only their own outputs and run in any order.
  void add(int64_t a, int64_t b = -1) {
    Unit u{static_cast<int32_t>(a), static_cast<int32_t>(b == a ? -1 : b), 0, 0};
    if (u.a >= 0) u.pa = lane_len_[u.a]++;
    if (u.b >= 0) u.pb = lane_len_[u.b]++;
    units_.push_back(u);
  }

  int64_t size() const { return static_cast<int64_t>(units_.size()); }

  // Runs visit(u) for every unit u on up to at::get_num_threads() threads (inline when called
  // inside a parallel region or with one thread: then in list order, which is always ready).
  template <class Visit>
  void run(const Visit& visit) const {
    const int64_t n = size();
    if (n == 0) return;
    const int64_t lanes = static_cast<int64_t>(lane_len_.size());
    std::unique_ptr<std::atomic<int32_t>[]> done(new std::atomic<int32_t>[std::max<int64_t>(lanes, 1)]);
    for (int64_t l = 0; l < lanes; ++l) done[l].store(0, std::memory_order_relaxed);
    std::unique_ptr<std::atomic<uint8_t>[]> claimed(new std::atomic<uint8_t>[n]);
    for (int64_t u = 0; u < n; ++u) claimed[u].store(0, std::memory_order_relaxed);
    std::atomic<int64_t> first_unclaimed{0};
    std::atomic<bool> failed{false};
    // Acquire: a unit reads what the lane's previous units wrote (their release below).
    auto ready = [&](const Unit& x) {
      return (x.a < 0 || done[x.a].load(std::memory_order_acquire) == x.pa) &&
             (x.b < 0 || done[x.b].load(std::memory_order_acquire) == x.pb);
    };
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (;;) {
        if (failed.load(std::memory_order_relaxed)) return;
        int64_t lo = first_unclaimed.load(std::memory_order_relaxed);
        while (lo < n && claimed[lo].load(std::memory_order_relaxed)) ++lo;
        if (lo >= n) return;  // the rest is claimed: the region's end waits for it
        int64_t seen = first_unclaimed.load(std::memory_order_relaxed);
        while (seen < lo && !first_unclaimed.compare_exchange_weak(seen, lo)) {
        }
        int64_t got = -1;
        for (int64_t u = lo; u < n; ++u) {
          if (claimed[u].load(std::memory_order_relaxed) || !ready(units_[u])) continue;
          if (claimed[u].exchange(1, std::memory_order_acq_rel) == 0) {
            got = u;
            break;
          }
        }
        if (got < 0) {  // every unclaimed unit waits for one in flight on another thread
          std::this_thread::yield();
          continue;
        }
        try {
          visit(got);
        } catch (...) {
          failed.store(true);  // the waiting threads leave; parallel_for rethrows this
          throw;
        }
        const Unit& x = units_[got];
        if (x.a >= 0) done[x.a].fetch_add(1, std::memory_order_release);
        if (x.b >= 0) done[x.b].fetch_add(1, std::memory_order_release);
      }
    });
  }

 private:
  struct Unit {
    int32_t a, b;    // lanes (-1: none)
    int32_t pa, pb;  // the unit's place in each lane's order
  };
  std::vector<Unit> units_;
  std::vector<int32_t> lane_len_;
};

}  // namespace fastssl
