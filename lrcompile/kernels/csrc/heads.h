/* Every head of one call, in parallel: the loop the sweeps (sweeps.h) and the direct algorithm
 * (direct.h) share. Each thread allocates its workspace once per call, then takes heads one at a
 * time (schedule(dynamic, 1): heads are few per thread and may differ in cost). A thread that could
 * not allocate skips the heads it is given and the call returns 1 (cpu.py raises MemoryError).
 *
 * A template, like the files that include it: included once per kernel and element type, after
 * they name
 *   RUN_HEADS                      the function it defines, int RUN_HEADS(const HEADS_PROBLEM* p, int backward):
 *                                  0 on success, 1 when a thread could not allocate its workspace
 *   HEADS_PROBLEM                  the call's struct; its `heads` and `threads` are read here
 *   HEADS_WORKSPACE                one thread's buffers: HEADS_ALLOC(&w, p, backward) is nonzero when all
 *                                  were allocated; HEADS_FREE(&w) runs after a failed allocation too
 *   HEADS_FORWARD, HEADS_BACKWARD  one head's work, (p, &w, h)
 * and undefined here after use.
 */

static int RUN_HEADS(const HEADS_PROBLEM* p, int backward)
{
    int failed = 0;
    #pragma omp parallel num_threads(p->threads)
    {
        HEADS_WORKSPACE w;
        const int ready = HEADS_ALLOC(&w, p, backward);
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t h = 0; h < p->heads; ++h) {
            if (!ready) continue;
            if (backward)
                HEADS_BACKWARD(p, &w, h);
            else
                HEADS_FORWARD(p, &w, h);
        }
        HEADS_FREE(&w);
    }
    return failed;
}

#undef RUN_HEADS
#undef HEADS_PROBLEM
#undef HEADS_WORKSPACE
#undef HEADS_ALLOC
#undef HEADS_FREE
#undef HEADS_FORWARD
#undef HEADS_BACKWARD
