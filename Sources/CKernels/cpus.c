#define _GNU_SOURCE
#include <sched.h>
#include "ckernels.h"

long ck_available_cpus(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
    const int count = CPU_COUNT(&set);
    return count > 0 ? count : 1;
}

#include <pthread.h>
#include <signal.h>

static volatile sig_atomic_t ck_stop_requested = 0;

static void ck_on_stop_signal(int signal_number) { ck_stop_requested = signal_number; }

int ck_stop_signal_install(int signal_number) {
    struct sigaction action = {0};
    action.sa_handler = ck_on_stop_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // system calls (MPI's, the file writes') go on as if nothing came
    if (sigaction(signal_number, &action, NULL) != 0) return -1;
    // A parent that blocked the signal (a test harness, some launchers) passed its mask on: unblock it here.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signal_number);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int ck_stop_signal_received(void) { return ck_stop_requested; }
