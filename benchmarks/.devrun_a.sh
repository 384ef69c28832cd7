set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python3 benchmarks/train_throughput.py --inference --batch 256 --steps 30 --warmup 10 --models slak_deploy convnext_timm --dtypes bf16 --compile on --compile_modes reduce-overhead --channels_last on --profile --json $OUT/inf.jsonl 2>&1 | grep -v Warning | tail -30
python3 benchmarks/train_throughput.py --batch 64 --steps 60 --warmup 10 -u 100 --models slak convnext_timm --dtypes bf16 --compile on --compile_modes reduce-overhead --channels_last both --profile --json $OUT/train.jsonl 2>&1 | grep -v Warning | tail -30
