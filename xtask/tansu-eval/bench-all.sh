#!/usr/bin/env bash
# Every bench.py case of the README table (SQLite, SQLite + header index, PostgreSQL; 1 and 16 partitions); JSON lines in /tmp/tansu-eval/bench.jsonl.
cd "$(dirname "$0")"; mkdir -p /tmp/tansu-eval
out=/tmp/tansu-eval/bench.jsonl
for parts in 1 16; do
  for eng in lite lite-idx pg; do
    dir=/tmp/tansu-eval/b-$eng-$parts; rm -rf $dir
    case $eng in
      lite) timeout 1200 python3 bench.py --storage sqlite://tansu.db --workdir $dir --partitions $parts ;;
      lite-idx) timeout 1200 python3 bench.py --storage sqlite://tansu.db --workdir $dir --partitions $parts --sqlite-index ;;
      pg) db=tansu_bench_$parts
          dropdb -h 127.0.0.1 -U postgres --if-exists $db; createdb -h 127.0.0.1 -U postgres $db
          psql -h 127.0.0.1 -U postgres -d $db -q -v ON_ERROR_STOP=1 -f ../stack.d/tansu-pg-schema.sql
          timeout 1200 python3 bench.py --storage "postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" --workdir $dir --partitions $parts
          dropdb -h 127.0.0.1 -U postgres --if-exists $db ;;
    esac 2>$dir.err | grep '^{' >> $out
  done
done
echo done > /tmp/tansu-eval/bench-all.done
