// The paper's Tables 1 and 2 (Zhang et al., arXiv 2010.00747 v2, MLHC 2022) in percent, embedded so that
// the binary needs no data file. Byte-identical to tools/paper_results.json (a test checks it).

extension PaperTable {
    /// The JSON text of tools/paper_results.json.
    public static let paperResultsJSON = #"""
{
 "source": "Zhang et al., Contrastive Learning of Medical Visual Representations from Paired Images and Text, arXiv 2010.00747 v2 (MLHC 2022), Tables 1 and 2",
 "units": "percent; RSNA, CheXpert, MURA: AUC; COVIDx: accuracy; retrieval: precision",
 "linear": {
  "Random Init": {
   "RSNA": {
    "1%": 55.0,
    "10%": 67.3,
    "all": 72.3
   },
   "CheXpert": {
    "1%": 58.2,
    "10%": 63.7,
    "all": 66.2
   },
   "COVIDx": {
    "10%": 69.2,
    "all": 73.5
   },
   "MURA": {
    "1%": 50.9,
    "10%": 56.8,
    "all": 62.0
   }
  },
  "ImageNet Init": {
   "RSNA": {
    "1%": 82.8,
    "10%": 85.4,
    "all": 86.9
   },
   "CheXpert": {
    "1%": 75.7,
    "10%": 79.7,
    "all": 81.0
   },
   "COVIDx": {
    "10%": 83.7,
    "all": 88.6
   },
   "MURA": {
    "1%": 63.8,
    "10%": 74.1,
    "all": 79.0
   }
  },
  "Caption-Transformer": {
   "RSNA": {
    "1%": 84.8,
    "10%": 87.5,
    "all": 89.5
   },
   "CheXpert": {
    "1%": 77.2,
    "10%": 82.6,
    "all": 83.9
   },
   "COVIDx": {
    "10%": 80.0,
    "all": 89.0
   },
   "MURA": {
    "1%": 66.5,
    "10%": 76.3,
    "all": 81.8
   }
  },
  "Caption-LSTM": {
   "RSNA": {
    "1%": 89.8,
    "10%": 90.8,
    "all": 91.3
   },
   "CheXpert": {
    "1%": 85.2,
    "10%": 85.3,
    "all": 86.2
   },
   "COVIDx": {
    "10%": 84.5,
    "all": 91.7
   },
   "MURA": {
    "1%": 75.2,
    "10%": 81.5,
    "all": 84.1
   }
  },
  "Contrastive-Binary": {
   "RSNA": {
    "1%": 88.9,
    "10%": 90.5,
    "all": 90.8
   },
   "CheXpert": {
    "1%": 84.5,
    "10%": 85.6,
    "all": 85.8
   },
   "COVIDx": {
    "10%": 80.5,
    "all": 90.8
   },
   "MURA": {
    "1%": 76.8,
    "10%": 81.7,
    "all": 85.3
   }
  },
  "ConVIRT": {
   "RSNA": {
    "1%": 90.7,
    "10%": 91.7,
    "all": 92.1
   },
   "CheXpert": {
    "1%": 85.9,
    "10%": 86.8,
    "all": 87.3
   },
   "COVIDx": {
    "10%": 85.9,
    "all": 91.7
   },
   "MURA": {
    "1%": 81.2,
    "10%": 85.1,
    "all": 87.6
   }
  }
 },
 "finetune": {
  "Random Init": {
   "RSNA": {
    "1%": 71.9,
    "10%": 82.2,
    "all": 88.5
   },
   "CheXpert": {
    "1%": 70.4,
    "10%": 81.1,
    "all": 85.8
   },
   "COVIDx": {
    "10%": 75.4,
    "all": 87.7
   },
   "MURA": {
    "1%": 56.8,
    "10%": 61.6,
    "all": 79.1
   }
  },
  "ImageNet Init": {
   "RSNA": {
    "1%": 83.1,
    "10%": 87.3,
    "all": 90.8
   },
   "CheXpert": {
    "1%": 80.1,
    "10%": 84.8,
    "all": 87.6
   },
   "COVIDx": {
    "10%": 84.4,
    "all": 90.3
   },
   "MURA": {
    "1%": 72.1,
    "10%": 81.8,
    "all": 87.0
   }
  },
  "Caption-Transformer": {
   "RSNA": {
    "1%": 86.3,
    "10%": 89.2,
    "all": 92.1
   },
   "CheXpert": {
    "1%": 81.5,
    "10%": 86.4,
    "all": 88.2
   },
   "COVIDx": {
    "10%": 88.3,
    "all": 92.3
   },
   "MURA": {
    "1%": 75.2,
    "10%": 83.2,
    "all": 87.6
   }
  },
  "Caption-LSTM": {
   "RSNA": {
    "1%": 87.2,
    "10%": 88.0,
    "all": 91.0
   },
   "CheXpert": {
    "1%": 83.5,
    "10%": 85.8,
    "all": 87.8
   },
   "COVIDx": {
    "10%": 83.8,
    "all": 90.8
   },
   "MURA": {
    "1%": 78.7,
    "10%": 83.3,
    "all": 87.8
   }
  },
  "Contrastive-Binary": {
   "RSNA": {
    "1%": 87.7,
    "10%": 89.9,
    "all": 91.2
   },
   "CheXpert": {
    "1%": 86.2,
    "10%": 86.1,
    "all": 87.7
   },
   "COVIDx": {
    "10%": 89.5,
    "all": 90.5
   },
   "MURA": {
    "1%": 80.6,
    "10%": 84.0,
    "all": 88.4
   }
  },
  "ConVIRT": {
   "RSNA": {
    "1%": 88.8,
    "10%": 91.5,
    "all": 92.7
   },
   "CheXpert": {
    "1%": 87.0,
    "10%": 88.1,
    "all": 88.1
   },
   "COVIDx": {
    "10%": 90.3,
    "all": 92.4
   },
   "MURA": {
    "1%": 81.3,
    "10%": 86.5,
    "all": 89.0
   }
  }
 },
 "retrieval_chexpert_8x200": {
  "Random": {
   "image_to_image": {
    "precision@5": 12.5,
    "precision@10": 12.5,
    "precision@50": 12.5
   },
   "text_to_image": {
    "precision@5": 12.5,
    "precision@10": 12.5,
    "precision@50": 12.5
   }
  },
  "ImageNet": {
   "image_to_image": {
    "precision@5": 14.8,
    "precision@10": 14.4,
    "precision@50": 15.0
   }
  },
  "Caption-Transformer": {
   "image_to_image": {
    "precision@5": 29.8,
    "precision@10": 28.0,
    "precision@50": 23.0
   }
  },
  "Caption-LSTM": {
   "image_to_image": {
    "precision@5": 34.8,
    "precision@10": 32.9,
    "precision@50": 28.1
   }
  },
  "Contrastive-Binary": {
   "image_to_image": {
    "precision@5": 38.8,
    "precision@10": 36.6,
    "precision@50": 29.7
   },
   "text_to_image": {
    "precision@5": 15.5,
    "precision@10": 14.5,
    "precision@50": 13.7
   }
  },
  "ConVIRT": {
   "image_to_image": {
    "precision@5": 45.0,
    "precision@10": 42.9,
    "precision@50": 35.7
   },
   "text_to_image": {
    "precision@5": 60.0,
    "precision@10": 57.5,
    "precision@50": 48.8
   }
  },
  "ConVIRT + CheXpert supervised": {
   "image_to_image": {
    "precision@5": 56.8,
    "precision@10": 56.3,
    "precision@50": 48.9
   }
  }
 }
}
"""#

}
