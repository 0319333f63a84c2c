# `make demo`: the whole pipeline on generated data, random weights and small images (a few minutes on 2 CPUs).
# Everything it writes stays under demo/ so it never touches real data, models or submissions.
PY ?= python
DEMO := demo
D := --data-dir $(DEMO)/data --model-dir $(DEMO)/model
HEAD := --batch-size 16
# Heads trained on augmented views (beyond the report) go to a model dir of their own.
V := --data-dir $(DEMO)/data --model-dir $(DEMO)/model_views

.PHONY: demo test test-fast lint clean-demo
demo:
	$(PY) 01_reorganize_data.py $(D) --demo 50
	$(PY) 02_extract_features.py $(D) --weights none --image-size 75 --models ResNet50 InceptionV3 Xception --views 4
	$(PY) 03_train_single.py $(D) $(HEAD) --submissions-dir $(DEMO)/submissions
	$(PY) 04_finetune_split.py $(D) --weights none --image-size 75 $(HEAD) --init all --epochs 10
	$(PY) 05_train_merge.py $(D) $(HEAD) --combos
	$(PY) 05_train_merge.py $(V) $(HEAD) --views 4 --epochs 14
	$(PY) 07_predict_submit.py $(V) --model $(DEMO)/model_views/merge/ResNet50+InceptionV3+Xception.keras --tta \
		--output $(DEMO)/submissions/tta.csv --analyze
	$(PY) 06_hyperopt_merge.py $(D) $(HEAD) --max-evals 3 --epochs 20
	$(PY) 03_train_single.py $(D) $(HEAD) --folds 3 --no-predict
	$(PY) 05_train_merge.py $(D) $(HEAD) --folds 3 --params $(DEMO)/model/hyperopt/best.json
	$(PY) 08_export_model.py $(D)
	$(PY) 07_predict_submit.py $(D) --output $(DEMO)/submissions/submission.csv --analyze
	$(PY) 07_predict_submit.py $(D) --output $(DEMO)/submissions/blend.csv --blend auto --calibrate temperature \
		--clip auto --analyze
	$(PY) predict.py $(DEMO)/data/test/1.jpg $(DEMO)/data/test/2.jpg $(DEMO)/data/test/3.jpg \
		--model $(DEMO)/model/export/catdog.keras --cam $(DEMO)/cam
	$(PY) predict.py $(DEMO)/data/test/1.jpg $(DEMO)/data/test/2.jpg $(DEMO)/data/test/3.jpg \
		--model $(DEMO)/model/export/catdog.tflite --json
	$(PY) 09_distill_student.py $(D) --teacher $(DEMO)/submissions/blend.json --student MobileNetV3Small \
		--weights none --image-size 64 --epochs 2 --warmup-epochs 0 $(HEAD)
	$(PY) 08_export_model.py $(D) --model $(DEMO)/model/student/MobileNetV3Small.keras \
		--out-dir $(DEMO)/model/export_student --calibration-images 20 --check 8
	$(PY) predict.py $(DEMO)/data/test/1.jpg $(DEMO)/data/test/2.jpg \
		--model $(DEMO)/model/export_student/catdog_int8.tflite --json
	@echo "demo done: $(DEMO)/submissions/submission.csv (the report's path), blend.csv (+ blend.json: 3-fold heads"
	@echo "blended, calibrated, clipped), tta.csv; suspects in $(DEMO)/model/analysis/suspects.txt; Grad-CAM overlays"
	@echo "in $(DEMO)/cam/ and $(DEMO)/model/analysis/cam/; a MobileNetV3Small distilled from blend.json, exported"
	@echo "(float16 and int8 TFLite among its formats) in $(DEMO)/model/export_student/"

# Every test, slow ones included: what CI runs.
test:
	$(PY) -m pytest -q

# The fast tier: every step's main path on demo data plus the unit tests (a few minutes on 2 CPUs).
test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check .

clean-demo:
	rm -rf $(DEMO)
