export WHEELS=.whl_testbed
source bench/device_env.sh
timeout 140 bash bench/device_run.sh tests > $OUT/tests_out.txt 2>&1; tail -4 $OUT/tests.log
for lm in 1 2; do
 timeout 140 python3 -m attnplug.bench.run --sizes 1024,2048,4096 --dtypes bf16 --configs default,joint --only session,fused --no-graphs --budget-ms 100 --kernel-config "{\"lm_direct\": $lm}" --json $OUT/bench_lm$lm.json 2>$OUT/bench_lm$lm.err > $OUT/bench_lm$lm.txt; grep -E "session ttr-(default|joint) |sdpa\[cudnn\] |fused " $OUT/bench_lm$lm.txt | grep -v "graph\|kernel-only" | cut -c1-120
done
for lm in 1 2; do
 timeout 80 python3 -m attnplug.bench.model --sizes 2048 --modes native,ttr-100,ttr-all --reps 3 --warmup 2 --kernel-config "{\"lm_direct\": $lm}" --json $OUT/model_lm$lm.json > $OUT/model_lm$lm.txt 2>&1; grep -E "native|ttr-" $OUT/model_lm$lm.txt | head -4 | cut -c1-150
done
